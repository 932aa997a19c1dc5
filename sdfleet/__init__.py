"""sdfleet: queued text-to-image generation with Stable Diffusion 3.5 on a fleet of GPU workers."""

__version__ = "0.1.0"
