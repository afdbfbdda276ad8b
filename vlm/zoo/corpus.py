"""The fixed English corpus the zoo's tokenizers are trained on.

Captions in tests and in the synthetic data sets talk about coloured shapes of some size at some
position ("a small red circle in the top left corner"), and chats wrap them in instructions and
answers. The corpus is built from word lists in a fixed order, so training on it is deterministic
and those captions tokenize into whole words rather than bytes.
"""

from __future__ import annotations

COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
          "gray", "grey", "cyan", "magenta", "teal", "navy", "gold", "silver", "dark", "light")
SHAPES = ("circle", "square", "triangle", "rectangle", "ellipse", "star", "diamond", "hexagon",
          "line", "cross", "dot", "ring", "heart", "arrow", "shape", "object", "box", "ball")
SIZES = ("small", "large", "big", "tiny", "huge", "medium", "little", "wide", "narrow", "tall",
         "short", "thin", "thick")
POSITIONS = ("left", "right", "top", "bottom", "center", "middle", "corner", "above", "below",
             "next", "near", "beside", "between", "inside", "outside", "upper", "lower", "edge")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "100")
CHAT = ("user", "assistant", "system", "you", "are", "a", "helpful", "describe", "this", "image",
        "picture", "photo", "what", "is", "in", "the", "there", "of", "and", "with", "on", "at",
        "to", "it", "shows", "show", "see", "can", "please", "caption", "question", "answer",
        "yes", "no", "how", "many", "where", "which", "color", "colour", "size", "background",
        "foreground", "scene", "contains", "containing", "drawn", "over", "under", "an", "one",
        "side", "looks", "like", "I", "We", "The", "A", "There", "This", "It", "What", "Describe",
        "briefly", "detail", "short", "sentence", "word", "words", "hello", "thank", "thanks",
        "sure", "here", "has", "have", "be", "was", "do", "does", "not", "only", "also", "each",
        "both", "some", "all", "more", "most", "than", "very", "plain", "solid", "filled",
        "outline", "pattern", "stripes", "striped", "dotted", "texture", "canvas", "frame")

COMMON = ("people", "person", "man", "woman", "child", "dog", "cat", "bird", "car", "tree", "house",
          "street", "water", "sky", "grass", "table", "chair", "window", "door", "room", "road",
          "standing", "sitting", "holding", "walking", "looking", "playing", "wearing", "front",
          "behind", "around", "through", "from", "into", "while", "other", "another", "their",
          "his", "her", "its", "they", "them", "that", "these", "those", "would", "could",
          "should", "will", "good", "great", "bright", "round", "straight", "curved", "empty",
          "full", "first", "second", "third", "last", "same", "different", "every", "group",
          "number", "count", "total", "answer", "explain", "because", "example", "model", "vision",
          "language", "text", "token", "tokens", "train", "training", "evaluate", "generate")

# Where things are, as captions say it; repeated so that these phrases become whole-word tokens.
PLACES = ("in the top left corner", "in the top right corner", "in the bottom left corner",
          "in the bottom right corner", "in the center", "on the left side", "on the right side",
          "at the top", "at the bottom", "in the middle of the image", "near the upper edge",
          "near the lower edge", "above the line", "below the circle", "next to the square")

_TEMPLATES = (
    "a {size} {color} {shape} {place}.",
    "There is a {color} {shape} {place} and a {color2} {shape} {place2}.",
    "a {size} {color} {shape} in the {pos} of the image.",
    "There is a {size} {color} {shape} near the {pos} edge.",
    "The picture shows {num} {color} {shape}s at the {pos}.",
    "Describe this image. It contains a {color} {shape} on a {color2} background.",
    "What color is the {shape}? The {shape} is {color}.",
    "How many {shape}s are there? There are {num}.",
    "USER: what is in the image? ASSISTANT: a {size} {color} {shape}.",
)


def corpus_lines() -> list[str]:
    """The corpus, one line per sentence, always the same list in the same order."""
    lines: list[str] = [" ".join(words) for words in (COLORS, SHAPES, SIZES, POSITIONS, NUMBERS, CHAT, COMMON)]
    i = 0
    for t, template in enumerate(_TEMPLATES):
        for j in range(60):
            i += 1
            lines.append(template.format(
                size=SIZES[(i * 7 + t) % len(SIZES)],
                color=COLORS[(i * 3 + j) % len(COLORS)],
                color2=COLORS[(i * 11 + 5) % len(COLORS)],
                shape=SHAPES[(i * 5 + 2 * t) % len(SHAPES)],
                pos=POSITIONS[(i * 13 + j) % len(POSITIONS)],
                num=NUMBERS[(i + t) % len(NUMBERS)],
                place=PLACES[(i * 7 + j) % len(PLACES)],
                place2=PLACES[(i * 3 + 1) % len(PLACES)],
            ))
    # Chat-template text (role names start a line there) and a system prompt.
    lines += ["system", "user", "assistant", "You are a helpful assistant.", "USER:", "ASSISTANT:",
              "Describe the image.", "in the center of the image", "in the centre"] * 3
    # Punctuation, digits and a little code-ish text so those bytes merge sensibly too.
    lines += ["Hello, world! How are you? I am fine; thanks.", "(1, 2) [3, 4] {5: 6} 7.5% 8/9",
              "Question: Answer: Caption: Image: Picture 1: Video 1:", "\n\n", "  indented text\ttab"]
    return lines
