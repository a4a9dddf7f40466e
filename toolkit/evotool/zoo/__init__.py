"""The model zoo: many small world VLMs, their evaluation manifests, analyses and behavioural ground truth."""

from evotool.zoo.build import ZooConfig, ZooMember, build_zoo, load_members

__all__ = ["ZooConfig", "ZooMember", "build_zoo", "load_members"]
