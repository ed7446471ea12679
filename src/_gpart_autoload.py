"""Let PEFT load GPart adapters in any process where gpart is installed, without `import gpart`.

gpart-autoload.pth (installed next to this module) imports it when the interpreter starts. It imports
nothing but `sys` and puts one finder on `sys.meta_path`; start-up stays as fast as without it. When
`peft` itself is imported, the finder lets it load as usual and then imports gpart's registration, so
`PeftModel.from_pretrained` and friends know "GPART". A gpart that fails to import becomes a warning:
`import peft` must keep working.
"""

import sys


class _PeftFinder:
    """Finds `peft` with the other finders and wraps its loader so that gpart registers after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterLoading(spec.loader)
                return spec
        return None


class _RegisterAfterLoading:
    """A loader that runs the real one, then registers gpart with the freshly imported peft."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # peft looks exactly as if loaded without us
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftFinder)]
        _register_gpart()


def _register_gpart():
    gpart = sys.modules.get("gpart")
    if gpart is not None and getattr(gpart.__spec__, "_initializing", False):
        return  # gpart's own import is importing peft, and gpart registers once it has finished
    try:
        from gpart.registration import register

        register()
    except Exception as error:  # any failure of an installed-but-broken gpart must leave peft usable
        import warnings

        message = (
            f"gpart is installed but could not be imported ({type(error).__name__}: {error}); PEFT will not "
            "load GPart adapters in this process. Reinstall it: pip install --force-reinstall gpart"
        )
        try:
            warnings.warn(message, RuntimeWarning)
        except RuntimeWarning:  # warnings made errors (-W error) must not make `import peft` fail either
            print(f"RuntimeWarning: {message}", file=sys.stderr)


sys.meta_path.insert(0, _PeftFinder())
