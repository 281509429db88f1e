"""The measurements: the one scan shape (``scan``), the one result protocol (``result``) and one module per
measurement (``sinks``, ``retrieval``, ``niah``, ``duo``, ``taxonomy``, ``heads``, ``effects``, ``spans``,
``qrhead``, ``representation``)."""
