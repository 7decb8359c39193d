"""The judge: tap alignment, comparison and reports across golden and candidate backends."""
