"""fast3dis_ros: FAST3DIS multi-view 3D instance segmentation as a ROS 2 perception package.

Only the ``ros`` sub-package imports rclpy or ROS message types; everything else (model, geometry,
pipeline, data, train, eval) is plain Python + numpy + torch and is importable without ROS.
"""

__version__ = "0.1.0"
