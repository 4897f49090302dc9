"""What serves the demo (``fastdiff demo``) and the small runs of ``fastdiff train`` / ``fastdiff sample``,
apart from the library: :mod:`~fastdiff.demo.data` (scikit-learn's 8×8 digits, Gaussian-mixture samples,
a digit classifier), :mod:`~fastdiff.demo.models` (small MLP and UNet denoisers and their checkpoint
loader), :mod:`~fastdiff.demo.images` (labelled PNG grids) and :mod:`~fastdiff.demo.run` (the demo run).

Nothing here is imported by the library; scikit-learn and Pillow are imported only when used
(``pip install 'fastdiff[demo]'``).
"""
