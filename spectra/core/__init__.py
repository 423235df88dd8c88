"""Pure math: spectral metrics of singular values and bases (metrics), the batched SVD engine
(linalg) and its methods (svd_methods). Arrays in, arrays out: no I/O, no store, no model."""
