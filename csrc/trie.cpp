// placeholder until the C++ trie lands
