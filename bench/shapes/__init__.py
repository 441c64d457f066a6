"""The embedded shapes world: vocabulary, prompt grammar, renderer, splits (``world``), the training
script of its tiny flow model (``train_model``) and the shipped model (``model/``)."""

from bench.shapes.world import (
                                ATTRIBUTES,
                                COLOURS,
                                POSITIONS,
                                SHAPES,
                                SIZES,
                                VOCABULARY,
                                Attributes,
                                parse_prompt,
                                prompt_file,
                                render,
                                render_batch,
                                split,
)

__all__ = ["ATTRIBUTES", "COLOURS", "POSITIONS", "SHAPES", "SIZES", "VOCABULARY", "Attributes", "parse_prompt",
           "prompt_file", "render", "render_batch", "split"]
