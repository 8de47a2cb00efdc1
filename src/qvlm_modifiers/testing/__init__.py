"""Test fixtures that ship with the plugin so that its users and its own suite can use them.

:mod:`qvlm_modifiers.testing.zoo` builds tiny, seeded, random-weight models of every supported VLM
family with their real transformers classes and offline processors. Nothing here is used by the
Modifiers, the save path or the loader; it is for tests, examples and benchmarks.
"""
