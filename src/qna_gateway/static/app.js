// the chat page's script
