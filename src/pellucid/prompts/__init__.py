"""System prompts, output styles, versioned prompt files and the context-window budget.

Prompt files: `schema` (the fields and their checks), `files` (PromptFile, reading and
writing YAML), `store` (finding prompts by name, saving), `diff`.

The core (system, styles, prompt files, budget) is model-independent: token counting comes
in as a function (`count_messages`). `counting.TokenCounter` supplies the real one from a
model's tokenizer and chat template (the loader's own, so it counts what the engine feeds
the model); `compose` puts a system prompt, a style and messages together;
`chat_session.ChatSession` runs a conversation that stays inside the context window.
"""

from pellucid.prompts.budget import (
    Allocation,
    Chunk,
    ContextBudget,
    Limits,
    SectionUsage,
    format_context,
    group_turns,
)
from pellucid.prompts.chat_session import ChatSession, Turn
from pellucid.prompts.compose import (
    effective_style,
    is_prompt_ref,
    load_prompt,
    merge_styles,
    system_messages,
    with_system,
)
from pellucid.prompts.counting import ConversationCount, MessageCount, TokenCounter
from pellucid.prompts.diff import FieldChange, PromptDiff, diff
from pellucid.prompts.files import PromptFile, load_file, parse_prompts
from pellucid.prompts.schema import bump, version_key
from pellucid.prompts.store import PromptStore, default_prompt_dir, split_ref
from pellucid.prompts.styles import (
    SKELETONS,
    Check,
    FormatReport,
    Section,
    SectionCheck,
    Skeleton,
    Style,
    StyleReport,
    check_bullets,
    check_code,
    check_format,
    check_table,
    check_word_limit,
    count_words,
    get_skeleton,
)
from pellucid.prompts.system import (
    AUTO,
    Example,
    SystemPrompt,
    always,
    never,
    role_sentence,
    when,
)

__all__ = [
    "AUTO",
    "ChatSession",
    "ConversationCount",
    "MessageCount",
    "TokenCounter",
    "Turn",
    "effective_style",
    "is_prompt_ref",
    "load_prompt",
    "merge_styles",
    "system_messages",
    "with_system",
    "SKELETONS",
    "Allocation",
    "Check",
    "Chunk",
    "ContextBudget",
    "Example",
    "FieldChange",
    "FormatReport",
    "Limits",
    "PromptDiff",
    "PromptFile",
    "PromptStore",
    "Section",
    "SectionCheck",
    "SectionUsage",
    "Skeleton",
    "Style",
    "StyleReport",
    "SystemPrompt",
    "always",
    "bump",
    "check_bullets",
    "check_code",
    "check_format",
    "check_table",
    "check_word_limit",
    "count_words",
    "default_prompt_dir",
    "diff",
    "format_context",
    "get_skeleton",
    "group_turns",
    "load_file",
    "never",
    "parse_prompts",
    "role_sentence",
    "split_ref",
    "version_key",
    "when",
]
