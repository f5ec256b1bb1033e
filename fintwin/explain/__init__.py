"""Reason codes: integrated-gradients attributions of a twin's outputs to each customer's events
and fields (``attribution``), grouped into ranked human-readable reasons (``reasons``), written
as tables and HTML (``explainer``, ``html``) and served next to the twin in Triton
(``serving``)."""
