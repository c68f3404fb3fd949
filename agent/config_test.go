package agent

import (
	"strings"
	"testing"
)

// validConfig passes Validate on any machine the tests run on.
func validConfig() Config {
	c := DefaultConfig()
	c.DataDir = "/tmp/x"
	c.RedisServer = "/bin/sh"
	c.RedisUser = "nobody"
	return c
}

// Validate refuses what would start an agent nobody can use safely, and
// says why; want is a part of the error, "" for none.
func TestConfigValidateSays(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"token of 16 bytes", func(c *Config) { c.Listen = "0.0.0.0:7070"; c.Token = "0123456789abcdef" }, ""},
		{"short token", func(c *Config) { c.Token = "s3cret" }, "at least 16"},
		{"blank token is no authentication", func(c *Config) { c.Listen = "0.0.0.0:7070"; c.Token = strings.Repeat(" ", 20) }, "no authentication is configured"},
		{"token with white space around it", func(c *Config) { c.Token = "0123456789abcdef\n" }, "white space"},
		{"listen port inside the instance ports", func(c *Config) { c.Listen = "127.0.0.1:16500" }, "inside the instance port range 16000-16999"},
		{"listen port at the range's low end", func(c *Config) { c.Listen = "127.0.0.1:16000" }, "inside the instance port range"},
		{"listen port at the range's high end", func(c *Config) { c.Listen = "127.0.0.1:16999" }, "inside the instance port range"},
		{"listen port just above the range", func(c *Config) { c.Listen = "127.0.0.1:17000" }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig()
			tt.mod(&c)
			err := c.Validate()
			if tt.want == "" && err != nil {
				t.Fatalf("Validate = %v, want nil", err)
			}
			if tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("Validate = %v, want an error saying %q", err, tt.want)
			}
		})
	}
}
