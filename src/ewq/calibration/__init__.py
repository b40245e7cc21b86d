"""Calibration: what ewq learns from running a model over a text.

* :mod:`ewq.calibration.text`: the calibration text itself, loaded once and named
  by its SHA-256 (what every cached value made from it is keyed by);
* :mod:`ewq.calibration.collect`: llama.cpp's forward pass with a callback on every
  matrix product: the importance matrix (llama-imatrix's sums) and the inputs' second
  moments, one per distinct input;
* :mod:`ewq.calibration.imatrix`: importance matrices computed for a source (a GGUF,
  or a Hugging Face checkpoint through llama.cpp's converter) and cached;
* :mod:`ewq.calibration.moments`: second moments for GPTQ rounding in memory that
  does not grow with the model: as many blocks per pass over the text as a bound
  allows, each group rounded as it completes.

A layer between the runtimes it drives (``ewq.evaluate``, ``ewq.quant``) and the
criteria and API that use what it measures.
"""
