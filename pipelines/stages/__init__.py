"""One plain function per stage: ``stage(cfg, inputs) -> outputs`` of frozen dataclasses."""
