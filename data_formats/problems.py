"""Named problems a record can have. Each is the ``code`` of a :class:`vlm.errors.DataError`.

Tests and the rejects file refer to problems by these names, so they are part of the public API.
"""

INVALID_JSON = "invalid_json"             # a line / array element is not valid JSON (line number given)
WRONG_TYPE = "wrong_type"                 # a field has the wrong JSON type (e.g. conversations is a dict)
UNKNOWN_FORMAT = "unknown_format"         # neither `conversations` nor `messages`
UNKNOWN_ROLE = "unknown_role"             # `from`/`role` outside the known names
EMPTY_CONVERSATION = "empty_conversation"  # no turns at all
NO_ASSISTANT_TURN = "no_assistant_turn"   # nothing to train on
NON_STRING_CONTENT = "non_string_content"  # a text value that is not a string
PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # `<image>` count != number of images
MISSING_IMAGE = "missing_image"           # the image file does not exist
CORRUPT_IMAGE = "corrupt_image"           # unreadable / truncated / not an image
IMAGE_TOO_LARGE = "image_too_large"       # over the pixel limit (decompression bomb guard)
PATH_ESCAPE = "path_escape"               # `../` or an absolute path outside image_root
TOO_LONG = "too_long"                     # over max_length and cannot be truncated in text only
NO_TRAINABLE_TOKENS = "no_trainable_tokens"  # after truncation nothing is left to learn from
NOT_UTF8 = "not_utf8"                     # bytes that are not UTF-8 (a Latin-1 / cp1252 file)
TURN_ORDER = "turn_order"                 # the assistant speaks first, or a system turn mid-way
EMPTY_REPLY = "empty_reply"               # an assistant turn with no text (nothing to learn)
IMAGE_IN_REPLY = "image_in_reply"         # an image inside an assistant turn
CONTROL_TOKEN = "control_token"           # chat-control tokens written as text (<|im_end|> ...)
IMAGE_SHAPE = "image_shape"               # an image the processor cannot resize (aspect ratio)
TEMPLATE_REFUSED = "template_refused"     # the model's chat template refuses the conversation
VIDEO_UNSUPPORTED = "video_unsupported"   # a video record for a family that takes no video
CORRUPT_VIDEO = "corrupt_video"           # a video file that does not open / has no frames

# Source-level problems (the whole file, not one record).
MISSING_FILE = "missing_file"
UNSUPPORTED_SOURCE = "unsupported_source"
UNREADABLE_FILE = "unreadable_file"       # the rest of a file cannot be read (corrupt parquet, a .json
                                          # array that cannot be resynced): the error says from where
EMPTY_SOURCE = "empty_source"             # a data file with no records at all

ALL = (INVALID_JSON, WRONG_TYPE, UNKNOWN_FORMAT, UNKNOWN_ROLE, EMPTY_CONVERSATION, NO_ASSISTANT_TURN,
       NON_STRING_CONTENT, PLACEHOLDER_MISMATCH, MISSING_IMAGE, CORRUPT_IMAGE, IMAGE_TOO_LARGE,
       PATH_ESCAPE, TOO_LONG, NO_TRAINABLE_TOKENS, NOT_UTF8, TURN_ORDER, EMPTY_REPLY, IMAGE_IN_REPLY,
       CONTROL_TOKEN, IMAGE_SHAPE, TEMPLATE_REFUSED, VIDEO_UNSUPPORTED, CORRUPT_VIDEO, MISSING_FILE, UNSUPPORTED_SOURCE,
       UNREADABLE_FILE, EMPTY_SOURCE)
