/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * Runs every core suite; each suite lives in its own check_*.c file.
 */


#include <stdlib.h>
#include <check.h>


/*
 * Plain extern declarations, never weak: a suite whose check_*.c file is
 * missing from the link is an undefined reference, so the build fails
 * instead of the suite silently not running.
 */
extern Suite *dsg_bucket_suite(void);
extern Suite *dsg_queue_suite(void);
extern Suite *dsg_entry_suite(void);
extern Suite *dsg_store_suite(void);
extern Suite *dsg_json_suite(void);
extern Suite *dsg_http_suite(void);
extern Suite *dsg_fleet_suite(void);
extern Suite *dsg_tokens_suite(void);


int
main(void)
{
    int        failed;
    SRunner   *sr;
    Suite   *(*suites[])(void) = {
        dsg_bucket_suite, dsg_queue_suite, dsg_entry_suite,
        dsg_store_suite, dsg_json_suite, dsg_http_suite, dsg_fleet_suite,
        dsg_tokens_suite
    };
    size_t     i;

    sr = srunner_create(NULL);

    for (i = 0; i < sizeof(suites) / sizeof(suites[0]); i++) {
        srunner_add_suite(sr, suites[i]());
    }

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);

    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
