"""Golden vectors and the verifier, as a small package.

    cases      CaseSpec and CASES: the case table (data), and its markdown rendering for the docs
    vectors    inputs, compute (by the reference), files (reproducible .npz + manifest), reading
    compare    a case's context: tolerances, masks, tie-aware comparison of one array
    mistakes   the catalogue of named mistakes (Mistake(name, quantity, compute, text))
    conventions  the one place the candidate lists read the reference's switches and functions
    verify     Report, verify_case, verify, and the ``rlhf-ref verify`` command line

``rlhf_ref.vectors`` and ``rlhf_ref.verify`` are the same modules as ``rlhf_ref.golden.vectors``
and ``rlhf_ref.golden.verify`` (kept for existing imports and ``python -m rlhf_ref.verify``).
"""
