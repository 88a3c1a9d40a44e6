"""SAT deployment core: text-prompted 3D segmentation of CT, MRI and PET volumes."""

__version__ = "0.1.0"
