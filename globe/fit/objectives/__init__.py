"""What a fit minimises: one module per objective, each a registered subclass of objectives.base.Objective."""
