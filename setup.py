"""ament_python package definition (also a plain setuptools package for `pip install -e .`)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "fast3dis_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "experiments", "experiments.*"]),
    package_data={PACKAGE: ["assets/*", "assets/**/*"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
        (f"share/{PACKAGE}/msg", glob("msg/*.msg")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="fast3dis_ros developers",
    maintainer_email="fast3dis@example.org",
    description="FAST3DIS multi-view 3D instance segmentation (Depth Anything 3 + anchored queries) for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "fast3dis_node = fast3dis_ros.ros.lifecycle:main",
            "fast3dis-demo = fast3dis_ros.cli:demo_main",
            "fast3dis-train = fast3dis_ros.cli:train_main",
            "fast3dis-eval = fast3dis_ros.cli:eval_main",
            "fast3dis-bench = fast3dis_ros.cli:bench_main",
            "fast3dis-synth = fast3dis_ros.cli:synth_main",
            "fast3dis-play = fast3dis_ros.cli:play_main",
            "fast3dis-export = fast3dis_ros.cli:export_main",
        ],
    },
)
