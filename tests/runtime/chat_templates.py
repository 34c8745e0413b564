"""Chat templates of the chat-template and server tests: the shapes real checkpoints ship."""
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
STRICT_ALTERNATION = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                      "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                      "{% endif %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
JSON_SKIP_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
                    "{{ message | tojson }}\n{% endfor %}{{ eos_token }}")
