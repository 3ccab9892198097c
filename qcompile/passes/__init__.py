"""The passes, each ``Program -> Program`` with a ``plan`` that predicts it.

``options`` holds every pass's options dataclass and the ordering rules (pure data, cheap to import);
``registry`` binds each pass name to its run and plan functions. This package's ``__init__`` imports
neither, so importing one pass (or the recipe module) does not import every other pass.
"""
