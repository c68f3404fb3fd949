package client

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
)

// The status table's LAST EXIT column gives the reason, with the message
// when there is one (why a spawn failed).
func TestWriteStatusLastExit(t *testing.T) {
	at := time.Now().Add(-time.Minute)
	for _, tt := range []struct {
		name string
		exit *apitype.Exit
		want string
	}{
		{"none", nil, "  -\n"},
		{"a crash", &apitype.Exit{Time: at, Code: 1, Reason: apitype.ReasonCrash}, "crash (code 1) 1m0s ago"},
		{"a kill", &apitype.Exit{Time: at, Code: -1, Signal: "killed", Reason: apitype.ReasonOOM}, "oom (killed) 1m0s ago"},
		{"a spawn failure", &apitype.Exit{Time: at, Code: -1, Reason: apitype.ReasonSpawnFailed, Message: "fork/exec /x: no such file or directory"},
			"spawn_failed: fork/exec /x: no such file or directory (code -1) 1m0s ago"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			in := apitype.Instance{ID: "i1", State: apitype.StateBackoff, Port: 16000, MemoryMB: 64, LastExit: tt.exit}
			if err := WriteStatus(&b, []apitype.Instance{in}); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(b.String(), tt.want) {
				t.Fatalf("status table:\n%s\nwant it to hold %q", b.String(), tt.want)
			}
		})
	}
}

// The EVICTION and TLS columns: the policy, and the TLS mode with its port.
func TestWriteStatusSettings(t *testing.T) {
	var b bytes.Buffer
	insts := []apitype.Instance{
		{ID: "plain", State: apitype.StateRunning, Port: 16000, MemoryMB: 64, MaxmemoryPolicy: "noeviction", TLS: "off"},
		{ID: "secure", State: apitype.StateRunning, Port: 16001, MemoryMB: 64, MaxmemoryPolicy: "allkeys-lru", TLS: "required", TLSPort: 16002},
	}
	if err := WriteStatus(&b, insts); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	for i, re := range []string{`LAST BACKUP\s+EVICTION\s+TLS\s+LAST EXIT`, `\s-\s+noeviction\s+-\s+-$`, `\s-\s+allkeys-lru\s+required:16002\s+-$`} {
		if !regexp.MustCompile(re).MatchString(lines[i]) {
			t.Fatalf("status line %d %q does not match %s", i, lines[i], re)
		}
	}
}

// The LAST BACKUP column gives the last backup's age and size, and a
// failure since.
func TestWriteStatusLastBackup(t *testing.T) {
	at := time.Now().Add(-90 * time.Second)
	for _, tt := range []struct {
		name string
		b    *apitype.BackupStatus
		want string
	}{
		{"no target", nil, "64MiB  -  "},
		{"never", &apitype.BackupStatus{Schedule: "24h"}, "never"},
		{"one", &apitype.BackupStatus{Last: &apitype.Backup{Time: at, Size: 3 << 20}}, "1m30s ago (3.0MiB)"},
		{"failing", &apitype.BackupStatus{Last: &apitype.Backup{Time: at, Size: 3 << 20}, LastError: "unreachable: dial tcp"}, "1m30s ago (3.0MiB), failing: unreachable"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			in := apitype.Instance{ID: "i1", State: apitype.StateRunning, Port: 16000, MemoryMB: 64, Backup: tt.b}
			if err := WriteStatus(&b, []apitype.Instance{in}); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(b.String(), tt.want) {
				t.Fatalf("status table:\n%s\nwant it to hold %q", b.String(), tt.want)
			}
		})
	}
}

// The DISK column: what the files take (data and logs) of the
// instance's reservation; "-" before the first measure.
func TestWriteStatusDisk(t *testing.T) {
	for _, tt := range []struct {
		disk *apitype.DiskUsage
		want string
	}{
		{nil, "64MiB  -  "},
		{&apitype.DiskUsage{ReservedBytes: 265 << 20}, "-/265.0MiB"},
		{&apitype.DiskUsage{DataBytes: 3 << 20, LogBytes: 1 << 19, ReservedBytes: 3 << 30, MeasuredAt: time.Now()}, "3.5MiB/3.0GiB"},
	} {
		var b bytes.Buffer
		in := apitype.Instance{ID: "i1", State: apitype.StateRunning, Port: 16000, MemoryMB: 64, Disk: tt.disk}
		if err := WriteStatus(&b, []apitype.Instance{in}); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(b.String(), tt.want) {
			t.Errorf("status table:\n%s\nwant it to hold %q", b.String(), tt.want)
		}
	}
	for n, want := range map[int64]string{0: "0B", 1023: "1023B", 1024: "1.0KiB", 1536 << 20: "1.5GiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}
