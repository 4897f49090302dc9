"""Published schedule tables (noise levels sigma = beta / alpha of the Stable Diffusion family's discrete
schedules, most noise first).

Align Your Steps (Sabour, Fidler, Kreis 2024; research.nvidia.com/labs/toronto-ai/AlignYourSteps): the optimized
10-step schedules for SD 1.5, SDXL and Stable Video Diffusion. NVIDIA publishes them two ways: as training
timesteps (SD 1.5, SDXL) and as sigmas in 3 decimals (all three; diffusers' scheduling_utils.AysSchedules).
``AYS`` ("timesteps", the default) holds SD's own levels at the published timesteps, the digits of ComfyUI's
comfy_extras/nodes_align_your_steps.py (so on SD's discrete path the grid lands on those timesteps exactly);
``AYS_SIGMAS`` ("sigmas") the published sigmas. SVD has sigmas only (its last level 0.002 as ComfyUI's). Other step
counts: log-linear interpolation (fastdiff.schedules.formulas.tabled).
"""

from __future__ import annotations

AYS_TIMESTEPS = {"sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0],
                 "sdxl": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0]}
AYS = {
    "sd15": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}
AYS_SIGMAS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "svd": AYS["svd"],
}
AYS_SOURCES = {"timesteps": AYS, "sigmas": AYS_SIGMAS}
AYS_ALIASES = {"sd1": "sd15", "sd1.5": "sd15", "sd15": "sd15", "sdxl": "sdxl", "svd": "svd"}
