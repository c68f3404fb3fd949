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
	os.WriteFile(file, []byte("0123456789abcdef-file"), 0o600)
	os.Chmod(file, 0o644)
	if _, err := parse([]string{"--token-file", file}, io.Discard); err == nil || !strings.Contains(err.Error(), "readable by every user") {
		t.Fatalf("world-readable token file: %v, want it refused", err)
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

// Every flag has an environment variable, --cpu-quota too.
func TestCPUQuotaFromEnvironment(t *testing.T) {
	t.Setenv("REDIS_AGENT_CPU_QUOTA", "1.5")
	st, err := parse(nil, io.Discard)
	if err != nil || st.cfg.Agent.CPUQuota != 1.5 {
		t.Fatalf("REDIS_AGENT_CPU_QUOTA=1.5: CPUQuota = %v, %v", st.cfg.Agent.CPUQuota, err)
	}
	if st, err := parse([]string{"--cpu-quota", "2"}, io.Discard); err != nil || st.cfg.Agent.CPUQuota != 2 {
		t.Fatalf("the flag does not win over the environment: %v, %v", st.cfg.Agent.CPUQuota, err)
	}
	t.Setenv("REDIS_AGENT_CPU_QUOTA", "half")
	if _, err := parse(nil, io.Discard); err == nil || !strings.Contains(err.Error(), "REDIS_AGENT_CPU_QUOTA") {
		t.Fatalf("REDIS_AGENT_CPU_QUOTA=half: %v, want an error naming it", err)
	}
}

// helpEntries returns -help's entry of every flag, by name.
func helpEntries(t *testing.T) map[string]string {
	t.Helper()
	var out strings.Builder
	if _, err := parse([]string{"-help"}, &out); err == nil {
		t.Fatal("-help parsed without flag.ErrHelp")
	}
	entries := map[string]string{}
	var name string
	for _, line := range strings.Split(out.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "  -"); ok {
			name, _, _ = strings.Cut(rest, " ")
		}
		if name != "" {
			entries[name] += line + "\n"
		}
	}
	if len(entries) < 30 {
		t.Fatalf("-help lists %d flags:\n%s", len(entries), out.String())
	}
	return entries
}

// Every flag's help names its environment variable.
func TestHelpNamesEveryEnvironmentVariable(t *testing.T) {
	for name, entry := range helpEntries(t) {
		if !strings.Contains(entry, "(env REDIS_AGENT_") {
			t.Errorf("-help of --%s names no environment variable:\n%s", name, entry)
		}
	}
}

// The health check is INFO, not PING: the help says what it does.
func TestHelpHealthCheckIsINFO(t *testing.T) {
	entries := helpEntries(t)
	for _, name := range []string{"health-interval", "health-timeout", "health-failures"} {
		if e := entries[name]; e == "" || strings.Contains(e, "PING") {
			t.Errorf("-help of --%s:\n%s", name, e)
		}
	}
	if !strings.Contains(entries["health-interval"], "INFO") {
		t.Errorf("-help of --health-interval does not say the check is INFO:\n%s", entries["health-interval"])
	}
}

// --max-uploads bounds the restores in progress; at least one.
func TestMaxUploads(t *testing.T) {
	if st, err := parse(nil, io.Discard); err != nil || st.cfg.MaxUploads != 4 {
		t.Fatalf("default max uploads = %d, %v; want 4", st.cfg.MaxUploads, err)
	}
	t.Setenv("REDIS_AGENT_MAX_UPLOADS", "8")
	if st, err := parse(nil, io.Discard); err != nil || st.cfg.MaxUploads != 8 {
		t.Fatalf("REDIS_AGENT_MAX_UPLOADS=8: %d, %v", st.cfg.MaxUploads, err)
	}
	if _, err := parse([]string{"--max-uploads", "0"}, io.Discard); err == nil || !strings.Contains(err.Error(), "--max-uploads") {
		t.Fatalf("--max-uploads 0: %v, want an error", err)
	}
}

// IO limits come from flags and the environment, sizes with units.
func TestIOFlags(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "1048576": 1 << 20, "64M": 64 << 20, "64MiB": 64 << 20, "1G": 1 << 30, "2k": 2 << 10, "10MB": 10 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "1X", "1.5G", "99999999999T"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) parsed", in)
		}
	}
	t.Setenv("REDIS_AGENT_IO_WRITE_BPS", "32M")
	t.Setenv("REDIS_AGENT_IO_READ_IOPS", "500")
	st, err := parse([]string{"--io-read-bps", "1G", "--io-weight", "200"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if a := st.cfg.Agent; a.IOWriteBPS != 32<<20 || a.IOReadBPS != 1<<30 || a.IOReadIOPS != 500 || a.IOWeight != 200 || a.IOWriteIOPS != 0 {
		t.Fatalf("IO limits = %d %d %d %d %d", a.IOReadBPS, a.IOWriteBPS, a.IOReadIOPS, a.IOWriteIOPS, a.IOWeight)
	}
	t.Setenv("REDIS_AGENT_IO_WRITE_BPS", "fast")
	if _, err := parse(nil, io.Discard); err == nil || !strings.Contains(err.Error(), "REDIS_AGENT_IO_WRITE_BPS") {
		t.Fatalf("REDIS_AGENT_IO_WRITE_BPS=fast: %v", err)
	}
}
