"""Features of a sampling call (guidance rules, several conditions, thresholding, classifier guidance, editing,
corrector steps, step noise, per-sample options), each one module contributing to the plan's declared points
(fastdiff.sampling.core.plan; docs/design.md, "Features"). Every module here is imported with the package, so a
module that registers something (a guidance rule: fastdiff.sampling.features.guidance.register_rule) needs no
other line to take part."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
