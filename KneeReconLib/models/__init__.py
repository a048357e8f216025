"""The networks and their files: the 3D U-Net and its fused inference form, the Chen network, the
style-transfer network, model files and cards, and the OpenVINO runtime."""
