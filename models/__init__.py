"""Model zoo: installed as ``onnxlrf.models`` (see pyproject.toml)."""
