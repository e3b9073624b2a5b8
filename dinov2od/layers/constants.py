"""Constants shared by every layer of the code (kept in one place)."""

# ImageNet channel statistics of RGB in [0, 1]: what DINOv2 and DINOv3 were trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
