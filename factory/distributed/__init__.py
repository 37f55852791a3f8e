"""Everything multi-process: process groups, DeepSpeed engines, ZeRO config. The only package
that imports deepspeed; model and training code see the engine seam of ``factory.train.engine``."""
