"""The hook core: the name vocabulary, the Probe/Edit/Bound protocol and hooks, ``capture()`` / ``intervene()``,
the ``Activations`` probe and interop with TransformerLens / nnsight."""
