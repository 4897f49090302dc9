"""Features of a sampling call (guidance rules, several conditions, thresholding, classifier guidance, editing,
corrector steps, step noise, per-sample options), each one module contributing to the plan's declared points
(fastdiff.sampling.core.plan; docs/design.md, "Features")."""
