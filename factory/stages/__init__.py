"""The pipeline's stages, one module each (select ... eval); ``registry.STAGES`` is their one list."""
