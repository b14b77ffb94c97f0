"""Command-line ``-p name:=value`` values, so that they win over ``--params-file`` (the stated rule).

Why: rcl merges ``--params-file`` and ``-p`` into one table, and when the same parameter comes with two
types (file ``window_size: 8``, command line ``window_size:=4.5`` or ``:=four``; ``cameras:=[]``, an
empty array, against the file's string array) it keeps the file's value and drops the command-line one
without a word. Without the file the same ``-p`` is refused at start-up (exit 2), so the file silently
changes what the command line means.

The rule (README, docs/RELIABILITY.md): **a ``-p`` value always overrides the params file**, and it is
validated exactly as without the file. The node re-reads the ``-p`` values of its own command line
(``--ros-args`` sections, node-wide or ``fast3dis:``-prefixed names, YAML values as rcl parses them)
and hands them to rclpy as ``parameter_overrides``; a value of the wrong type or range then fails
start-up with exit 2 naming the parameter, as it would without the file.
"""

from __future__ import annotations

__all__ = ["command_line_parameters", "as_parameters", "with_command_line"]


def command_line_parameters(argv: list[str], node_name: str) -> dict[str, object]:
    """``{name: value}`` of the ``-p`` / ``--param`` assignments in the ``--ros-args`` sections of
    ``argv`` that apply to ``node_name`` (later ones win, as in rcl)."""
    import yaml

    out: dict[str, object] = {}
    in_ros = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--ros-args":
            in_ros = True
        elif a == "--":
            in_ros = False
        elif in_ros and a in ("-p", "--param") and i + 1 < len(argv):
            i += 1
            name, sep, raw = argv[i].partition(":=")
            if sep:
                node, _, pname = name.rpartition(":")
                if node in ("", node_name, f"/{node_name}"):
                    try:
                        out[pname] = yaml.safe_load(raw) if raw != "" else ""
                    except yaml.YAMLError:
                        out[pname] = raw
        i += 1
    return out


def as_parameters(values: dict[str, object], defaults: dict[str, object]) -> list:
    """rclpy ``Parameter`` objects for the values of known parameters (an empty list gets the type of the
    parameter's default so that it reaches validation); ``ValueError`` for a value ROS cannot hold."""
    from rclpy.parameter import Parameter

    out = []
    for name, v in values.items():
        if name not in defaults:
            continue
        try:
            if isinstance(v, list) and not v and isinstance(defaults[name], list):
                out.append(Parameter(name, Parameter.Type.STRING_ARRAY, []))
            else:
                out.append(Parameter(name, value=v))
        except Exception as e:  # noqa: BLE001 - rclpy raises TypeError for values it cannot type
            raise ValueError(f"-p {name}:={v!r}: not a ROS parameter value ({e})") from e
    return out


def with_command_line(command_line: list[str] | None, node_kwargs: dict, node_name: str) -> dict:
    """``node_kwargs`` with the ``-p`` values of ``command_line`` (and of ``cli_args``) appended as
    ``parameter_overrides``, so they win over ``--params-file`` whatever their type (the rule above)."""
    from . import params as P

    cli = command_line_parameters(list(command_line or []) + list(node_kwargs.get("cli_args") or []), node_name)
    if not cli:
        return node_kwargs
    out = dict(node_kwargs)
    out["parameter_overrides"] = list(node_kwargs.get("parameter_overrides") or []) + \
        as_parameters(cli, {p.name: p.default for p in P.PARAMS})
    return out
