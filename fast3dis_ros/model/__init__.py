from fast3dis_ros.model.library_noise import quiet_depth_anything

quiet_depth_anything()
