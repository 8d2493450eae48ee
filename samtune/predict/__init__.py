"""Prediction: prompts to masks (:class:`~samtune.predict.segmenter.Segmenter`, whole image or prompt-focused
zoom), the prompt modes (:mod:`samtune.predict.modes`) and automatic mask generation (:mod:`samtune.predict.auto`).
"""
