"""Chat prompts for the end-to-end equivalence test: varied topics and lengths."""

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of a paperclip.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the planets of the solar system?",
    "Write a Python function that reverses a string.",
    "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
    "How do vaccines work? Answer briefly, in plain words, for a reader with no background in biology, "
    "and mention why booster doses are sometimes needed.",
    "Tell me a fun fact about octopuses.",
]
