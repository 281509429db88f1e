"""The base layer: what every other layer may import (errors, provenance, confined file writes, plotly builders,
rich display). Nothing here imports another workbench layer."""
