"""The Gradio demo, imported as genalign.app: `genalign demo` or `python -m genalign.app` (see demo.py).

Gradio is imported only when the page is built, so `import genalign.app` stays light."""

__all__ = ["DemoInputError", "DemoModel", "Limits", "build_demo", "main", "validate_request"]


def __getattr__(name):
    if name in __all__:
        from . import demo

        return getattr(demo, name)
    raise AttributeError(name)
