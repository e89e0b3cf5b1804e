"""The numbers every part of Fun-Audio-Chat agrees on, in one place: rates and the released speech-id layout.

Audio enters at 16 kHz (Whisper's front end); the speech tokenizer emits 25 ids per second (CosyVoice's S3
tokens, 40 ms each); the LLM reads them in groups of 5, one position per 200 ms (5 Hz). The speech vocabulary
of the released model is the 3^8 = 6561 S3 codes followed by bos, eos, pad and one unused id (6565 rows in
``audio_tower.embed_tokens``; docs/released_model.md §1.2).
"""
from __future__ import annotations

__all__ = ["SAMPLE_RATE", "TOKEN_RATE_HZ", "GROUP_SIZE", "LLM_RATE_HZ", "SPEECH_CODES", "SPEECH_BOS_ID",
           "SPEECH_EOS_ID", "SPEECH_PAD_ID", "CODEBOOK_SIZE"]

SAMPLE_RATE = 16000            # Hz: every waveform the models read
TOKEN_RATE_HZ = 25             # speech ids (and continuous-encoder frames) per second
GROUP_SIZE = 5                 # speech ids per LLM position
LLM_RATE_HZ = TOKEN_RATE_HZ // GROUP_SIZE     # 5 LLM positions per second of speech
SPEECH_CODES = 6561            # S3 codes 0 .. 6560 (3^8); the ids above are control ids
SPEECH_BOS_ID = 6561           # the delay / start of the assistant's speech
SPEECH_EOS_ID = 6562           # end of the assistant's speech (a whole group of it)
SPEECH_PAD_ID = 6563           # <|audio_pad|>: padding and the user's audio slots (padding_idx of the table)
CODEBOOK_SIZE = 6565           # rows of the speech table: codes + bos, eos, pad, one unused id
