"""Inference engines behind one narrow interface (``peerinfer.engine.base.Engine``)."""
