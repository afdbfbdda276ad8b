"""Dataset readers, validation, chat rendering, image-token collation (installed as ``vlm.data_formats``)."""
