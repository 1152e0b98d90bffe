"""The dry run: each phase's memory and time (estimate, timing), summed by plan_fit at the shape the fit chooses."""
