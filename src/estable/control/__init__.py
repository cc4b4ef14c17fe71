"""ControlNet at generation time: control units (a ControlNet, a control image, a weight, a part of the schedule)
and the control images Estable makes without downloaded weights (edges, scribbles, colour segmentation)."""

from .guidance import ControlUnit, control_infotext, control_record

__all__ = ["ControlUnit", "control_infotext", "control_record"]
