package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A token from the environment or a file loses the white space around it;
// a blank one is no token, so a non-loopback listen is refused.
func TestTokenIsTrimmed(t *testing.T) {
	t.Setenv("REDIS_AGENT_TOKEN", "  0123456789abcdef-token\n")
	st, err := parse(nil, io.Discard)
	if err != nil || st.cfg.Token != "0123456789abcdef-token" {
		t.Fatalf("token from the environment = %q, %v; want it trimmed", st.cfg.Token, err)
	}

	file := filepath.Join(t.TempDir(), "token")
	os.WriteFile(file, []byte("\t0123456789abcdef-file \n"), 0o600)
	st, err = parse([]string{"--token-file", file}, io.Discard)
	if err != nil || st.cfg.Token != "0123456789abcdef-file" {
		t.Fatalf("token from a file = %q, %v; want it trimmed", st.cfg.Token, err)
	}
	os.WriteFile(file, []byte(" \n"), 0o600)
	if _, err := parse([]string{"--token-file", file}, io.Discard); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("blank token file: %v, want an error saying it is empty", err)
	}

	t.Setenv("REDIS_AGENT_TOKEN", " \n\t")
	st, err = parse([]string{"--listen", "0.0.0.0:7070"}, io.Discard)
	if err != nil || st.cfg.Token != "" {
		t.Fatalf("blank token = %q, %v; want none", st.cfg.Token, err)
	}
	if err := st.cfg.Validate(); err == nil || !strings.Contains(err.Error(), "no authentication is configured") {
		t.Fatalf("non-loopback listen with a blank token: Validate = %v, want a refusal", err)
	}

	t.Setenv("REDIS_AGENT_TOKEN", "s3cret")
	st, _ = parse(nil, io.Discard)
	if err := st.cfg.Validate(); err == nil || !strings.Contains(err.Error(), "at least 16") {
		t.Fatalf("a 6-byte token: Validate = %v, want a refusal", err)
	}
}
