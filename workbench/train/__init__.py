"""Training scripts for the zoo's models (``python -m workbench.train.tiny_moe``): above the measurements, so
the load layer that ships their output never imports them."""
