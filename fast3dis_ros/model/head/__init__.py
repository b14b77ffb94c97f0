"""The FAST3DIS instance head: pixel decoder, 3D anchors, anchor-sampling decoder, prediction heads."""
