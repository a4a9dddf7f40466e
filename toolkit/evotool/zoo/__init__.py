"""The model zoo: many small world VLMs, their evaluation manifests, analyses and behavioural ground truth.

``evotool.zoo.config`` holds the (torch-free) configs, ``build`` the build steps, ``report`` the member table,
``curves`` the compact per-token curves of an analysis run.
"""

from evotool.zoo.config import ZooConfig, ZooMember, load_members

__all__ = ["ZooConfig", "ZooMember", "load_members"]
