"""The fit engine: a family's fit as stages over one FamilyProblem (family.fit_family), a checkpoint streamed
through it (model.fit_model), the resumable [AM, VarPro] runner, the shape and warm-start stages.

Start reading at globe.fit.engine.family, whose docstring tells a family fit stage by stage."""
from globe.fit.engine.family import fit_family
from globe.fit.engine.model import fit_model

__all__ = ["fit_family", "fit_model"]
