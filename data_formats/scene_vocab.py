"""The words of the synthetic scene-captioning task, and how a caption is built from them.

A :class:`SceneVocab` maps each attribute value (a word or phrase) to what gets drawn, and holds the
caption template. Two vocabularies ship: :data:`DEFAULT_VOCAB` (plain English, "a large red circle
in the top left") and :data:`VARIANT_VOCAB` (unusual words in a different order, "blob, vermilion,
huge, northwest corner"), a *fresh task* a pretrained base cannot already do.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTRIBUTES = ("shape", "color", "size", "position")
SHAPE_KINDS = ("circle", "square", "triangle", "diamond")
POSITION_CENTERS = {"top_left": (0.27, 0.27), "top_right": (0.73, 0.27), "bottom_left": (0.27, 0.73),
                    "bottom_right": (0.73, 0.73), "center": (0.5, 0.5)}


@dataclass(frozen=True)
class SceneVocab:
    """Attribute words -> drawing parameters, plus the caption template.

    shapes: word -> one of :data:`SHAPE_KINDS`; colors: word -> RGB; sizes: word -> radius as a
    fraction of the image side; positions: word -> key of :data:`POSITION_CENTERS`.
    ``template`` uses ``{shape} {color} {size} {position}`` in any order.
    """

    name: str
    shapes: dict
    colors: dict
    sizes: dict
    positions: dict
    template: str = "a {size} {color} {shape} in the {position}"
    question: str = "Describe the image."

    def words(self, attribute: str) -> dict:
        return {"shape": self.shapes, "color": self.colors, "size": self.sizes,
                "position": self.positions}[attribute]

    def caption(self, scene) -> str:
        return self.template.format(**{a: getattr(scene, a) for a in ATTRIBUTES})

    def renamed(self, name: str, *, shapes: dict, colors: dict, sizes: dict, positions: dict,
                **fields) -> "SceneVocab":
        """The same scenes under other words: each table maps a new word to the word of this
        vocabulary it stands for (so RGB values, sizes and positions live in one place)."""
        def pick(table: dict, words: dict) -> dict:
            return {new: table[old] for new, old in words.items()}

        return SceneVocab(name=name, shapes=pick(self.shapes, shapes), colors=pick(self.colors, colors),
                          sizes=pick(self.sizes, sizes), positions=pick(self.positions, positions), **fields)


DEFAULT_VOCAB = SceneVocab(
    name="default",
    shapes={"circle": "circle", "square": "square", "triangle": "triangle", "diamond": "diamond"},
    colors={"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
            "yellow": (235, 200, 30), "purple": (140, 60, 180), "black": (20, 20, 20)},
    sizes={"small": 0.11, "large": 0.21},
    positions={"top left": "top_left", "top right": "top_right", "bottom left": "bottom_left",
               "bottom right": "bottom_right", "center": "center"},
)

VARIANT_VOCAB = DEFAULT_VOCAB.renamed(
    "variant",
    shapes={"blob": "circle", "tile": "square", "wedge": "triangle", "gem": "diamond"},
    colors={"vermilion": "red", "jade": "green", "cobalt": "blue", "saffron": "yellow", "mauve": "purple",
            "onyx": "black"},
    sizes={"tiny": "small", "huge": "large"},
    positions={"northwest corner": "top left", "northeast corner": "top right",
               "southwest corner": "bottom left", "southeast corner": "bottom right", "middle": "center"},
    template="{shape}, {color}, {size}, {position}",
    question="Name the object.",
)

# The embedded demo's task (vlm demo): the same scenes named with single-token words the demo base
# never produced in a caption, in a new order ("navy ball, huge, upper left"). See vlm.demo.
DEMO_VOCAB = DEFAULT_VOCAB.renamed(
    "demo",
    shapes={"ball": "circle", "box": "square", "arrow": "triangle", "star": "diamond"},
    colors={"magenta": "red", "teal": "green", "navy": "blue", "gold": "yellow", "pink": "purple",
            "dark": "black"},
    sizes={"tiny": "small", "huge": "large"},
    positions={"upper left": "top left", "upper right": "top right", "lower left": "bottom left",
               "lower right": "bottom right", "middle": "center"},
    template="{color} {shape}, {size}, {position}",
    question="Name the object.",
)

VOCABS = {v.name: v for v in (DEFAULT_VOCAB, VARIANT_VOCAB, DEMO_VOCAB)}
