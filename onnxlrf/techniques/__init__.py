"""Compression techniques, one package each, behind the protocol in :mod:`onnxlrf.techniques.base`."""
