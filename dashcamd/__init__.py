"""dashcamd: anonymise dashcam footage unattended (faces and plates blurred, h264 out)."""
